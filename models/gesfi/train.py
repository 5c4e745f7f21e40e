"""Training by one loop: ERM, DANN (physical domain labels) and GesFi (mined latent domains).

    erm    cross-entropy on the gestures only.
    dann   + a domain discriminator behind gradient reversal on the classifier's feature, fed the
           physical domain labels (the values of `domain_factor`): the feature learns to not tell
           them apart.
    gesfi  the same alignment, but on latent domains that GesFi finds by itself:
           1. a separate domain encoder learns a domain feature z: a decoder must rebuild the
              input from (z, gesture label), so z keeps how the domain renders the gesture, while a
              gesture discriminator behind gradient reversal strips the gesture from z
              (class-wise adversarial learning);
              domain_input="profile" (default): encoder and decoder see the image's Doppler
              profile, the mean and max over time of each receiver's Doppler bins. The domain
              (where the user stands and faces, the room, the user) shows in which receivers see
              which Doppler speeds and in the floor around them, not in *when* the gesture is made;
              on the whole image the start time of the gesture within the window is the largest
              variation the gesture label does not explain, and z learnt it (a linear probe tells
              the quartile of the gesture's time centroid from z with 85% accuracy, 25% chance;
              on the profile: 36%). domain_input="image": the whole image (the first version);
           2. z is standardised within each gesture (class-wise: removes what the adversary left
              of the gesture; a linear probe then finds it at chance instead of 60-67%), then
              globally, and clustered with k-means into K latent domains; K is the one of
              2..k_max with the best silhouette score (or fixed by the caller);
           3. the classifier is trained with the latent domains as the discriminator's labels.
The adversarial weight ramps up as in DANN: lam(p) = adv_weight * (2 / (1 + exp(-10 p)) - 1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.gesfi.dataset import GesFiData, holdout_split
from models.gesfi.net import Decoder, Discriminator, Features, GesFiNet, check_arch, grad_reverse
from models.gesfi.simulate import FACTORS

log = logging.getLogger(__name__)

METHODS = ("erm", "dann", "gesfi")
# on_progress(stage, done, total, info): stage is "mine" (GesFi step 1) or "train"; one call per epoch.
Progress = Callable[[str, int, int, dict], None]


@dataclass(frozen=True)
class TrainConfig:
    method: str = "gesfi"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    width: int = 16  # channels of the first conv block
    arch: str = "compact"  # GesFiNet architecture: "compact" or "offload" (heavy body behind a compact stem)
    depth: int = 6  # arch "offload": conv layers in the body
    body_width: int = 384  # arch "offload": channels of the body
    feat_dim: int = 128
    adv_weight: float = 0.5  # max gradient-reversal coefficient of the domain adversary
    classwise: bool = False  # the domain discriminator sees feature x gesture one-hot (aligns P(f | y))
    domain_factor: str = "location"  # DANN's physical domain labels
    mine_epochs: int = 20  # GesFi step 1
    domain_dim: int = 16  # size of GesFi's domain feature z
    mine_adv_weight: float = 1.0  # gesture adversary on z
    domain_input: str = "profile"  # what the domain encoder sees: "profile" (time-marginal) or "image"
    classwise_standardize: bool = True  # standardise z within each gesture before clustering
    k: int = 0  # latent domains; 0 = choose by silhouette over 2..k_max
    k_max: int = 8
    val_frac: float = 0.15  # held out of the training domains for in-domain accuracy
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.domain_factor not in FACTORS:
            raise ValueError(f"domain_factor must be one of {FACTORS}, got {self.domain_factor!r}")
        if self.epochs < 1 or self.mine_epochs < 1 or self.batch_size < 2 or self.threads < 1:
            raise ValueError("epochs, mine_epochs and threads must be >= 1 and batch_size >= 2")
        check_arch(self.arch, self.depth, self.body_width)
        if self.domain_input not in ("profile", "image"):
            raise ValueError(f"domain_input must be 'profile' or 'image', got {self.domain_input!r}")
        if self.k < 0 or self.k == 1 or self.k_max < 2:
            raise ValueError(f"k must be 0 (silhouette) or >= 2 and k_max >= 2, got k={self.k} k_max={self.k_max}")


@dataclass
class LatentDomains:
    labels: np.ndarray  # (N_train,) latent domain per training sample
    k: int
    silhouette: dict[int, float]  # K -> silhouette score (the selection table)
    z: np.ndarray  # (N_train, domain_dim) standardised domain features
    diagnostics: dict = field(default_factory=dict)  # NMI with gestures and physical factors


@dataclass
class TrainResult:
    model: GesFiNet
    config: TrainConfig
    train_idx: np.ndarray  # indices (into the data given) the model was fitted on
    val_idx: np.ndarray  # held-out indices from the same domains (in-domain accuracy)
    val_acc: float
    history: list[dict]
    latent: LatentDomains | None
    seconds: float


def adv_lambda(p: float, weight: float) -> float:
    return weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def _batches(n: int, bs: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    nb = max(1, n // bs)  # the ragged remainder joins the last batch (batch norm dislikes batches of 1)
    return [perm[i * bs : (i + 1) * bs] if i < nb - 1 else perm[i * bs :] for i in range(nb)]


def _make_model(data: GesFiData, cfg: TrainConfig) -> GesFiNet:
    c, h, w = data.x.shape[1:]
    return GesFiNet(data.n_classes, c, cfg.width, cfg.feat_dim, (h, w), cfg.arch, cfg.depth, cfg.body_width)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Logits (N, n_classes) of a model on images x (N, C, H, W)."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == y).mean()) if len(y) else float("nan")


# ---------------------------------------------------------------------------------------------
# GesFi step 1-2: latent domain mining


def _adversarial_domain_feature(inputs: torch.Tensor, y: torch.Tensor, target: torch.Tensor, enc: nn.Module,
                                dec: nn.Module, n_classes: int, epochs: int, cfg: TrainConfig,
                                on_progress: Progress | None) -> np.ndarray:
    """Class-wise adversarial learning of a domain feature z = enc(inputs).

    Loss: reconstruction of `target` by dec(z, one-hot gesture) (z keeps what the gesture does not
    explain) + cross-entropy of a gesture discriminator fed z through gradient reversal (z loses
    what tells the gestures apart).
    """
    rng = np.random.default_rng(cfg.seed + 1)
    gdisc = Discriminator(cfg.domain_dim, n_classes)
    params = [*enc.parameters(), *gdisc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    onehot = F.one_hot(y, n_classes).float()
    steps = epochs * max(1, len(y) // cfg.batch_size)
    step = 0
    for ep in range(epochs):
        enc.train(), gdisc.train(), dec.train()
        tot_rec = tot_acc = 0.0
        nb = 0
        for b in _batches(len(y), cfg.batch_size, rng):
            lam = adv_lambda(step / steps, cfg.mine_adv_weight)
            z = enc(inputs[b])
            rec = F.mse_loss(dec(z, onehot[b]), target[b]) * 100.0  # per-pixel error in %^2 / 100
            g_logits = gdisc(grad_reverse(z, lam))
            loss = rec + F.cross_entropy(g_logits, y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_rec += rec.item()
            tot_acc += float((g_logits.argmax(1) == y[b]).float().mean())
            nb += 1
            step += 1
        if on_progress:
            on_progress("mine", ep + 1, epochs, {"rec": tot_rec / nb, "gesture_acc_on_z": tot_acc / nb})
    enc.eval()
    with torch.no_grad():
        return torch.cat([enc(inputs[i : i + 512]) for i in range(0, len(y), 512)]).numpy()


def learn_domain_feature(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig,
                         on_progress: Progress | None = None) -> np.ndarray:
    """GesFi step 1: the domain feature z (N, domain_dim) of each training sample.

    domain_input="profile": an MLP on the Doppler profile (mean and max over time, per receiver and
    Doppler bin; invariant to when the gesture happens), the decoder rebuilds the mean profile.
    domain_input="image": a small CNN on the image, the decoder rebuilds it at half resolution.
    """
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    c, h, w = x.shape[1:]
    if cfg.domain_input == "profile":
        prof = torch.cat([xt.mean(-1), xt.amax(-1)], dim=1).flatten(1)  # (N, 2 C H)
        enc = nn.Sequential(nn.Linear(prof.shape[1], 128), nn.ReLU(inplace=True), nn.Linear(128, cfg.domain_dim))
        dec = Decoder(cfg.domain_dim, n_classes, (c, h, 1))
        return _adversarial_domain_feature(prof, yt, xt.mean(-1, keepdim=True), enc, dec, n_classes,
                                           cfg.mine_epochs, cfg, on_progress)
    enc = nn.Sequential(Features(c, max(8, cfg.width // 2), 64, (h, w)), nn.Linear(64, cfg.domain_dim))
    dec = Decoder(cfg.domain_dim, n_classes, (c, h // 2, w // 2))
    return _adversarial_domain_feature(xt, yt, F.avg_pool2d(xt, 2), enc, dec, n_classes, cfg.mine_epochs, cfg,
                                       on_progress)


def standardize_within_classes(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z with each gesture's mean removed and its per-dimension spread scaled to 1 (class-wise)."""
    out = np.array(z, dtype=np.float64, copy=True)
    for c in np.unique(y):
        m = y == c
        out[m] = (out[m] - out[m].mean(0)) / (out[m].std(0) + 1e-8)
    return out.astype(np.float32)


def cluster_domains(z: np.ndarray, k: int, k_max: int, seed: int) -> tuple[np.ndarray, int, dict[int, float]]:
    """k-means on standardised z. k=0: pick K in 2..k_max with the best silhouette score."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    zs = (z - z.mean(0)) / (z.std(0) + 1e-8)
    ks = [k] if k else list(range(2, max(2, min(k_max, len(z) - 1)) + 1))
    table: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for kk in ks:
        labels = KMeans(n_clusters=kk, n_init=4, random_state=seed).fit_predict(zs)
        fits[kk] = labels
        n_s = min(2000, len(zs))
        table[kk] = float(silhouette_score(zs, labels, sample_size=n_s, random_state=seed)) if kk > 1 else 0.0
    best = k if k else max(table, key=lambda kk: table[kk])
    return fits[best], best, table


def probe_accuracy(z: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """How well a fresh linear probe tells `labels` from z: 3-fold cross-validated accuracy.

    The check that class-wise adversarial learning really stripped the gesture from the domain
    feature (the adversary's own accuracy during training says little: it is being fooled).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    counts = np.bincount(labels)
    folds = int(min(3, counts[counts > 0].min()))
    if folds < 2 or len(set(labels.tolist())) < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(max_iter=500), z, labels, cv=cv).mean())


def mine_latent_domains(data: GesFiData, idx: np.ndarray, cfg: TrainConfig,
                        on_progress: Progress | None = None) -> LatentDomains:
    from sklearn.metrics import normalized_mutual_info_score as nmi

    z = learn_domain_feature(data.x[idx], data.y[idx], data.n_classes, cfg, on_progress)
    if cfg.classwise_standardize:
        z = standardize_within_classes(z, data.y[idx])
    labels, k, table = cluster_domains(z, cfg.k, cfg.k_max, cfg.seed)
    diag = {"nmi_gesture": float(nmi(data.y[idx], labels))}
    diag.update({f"nmi_{f}": float(nmi(data.domains[f][idx], labels)) for f in FACTORS})
    zs = (z - z.mean(0)) / (z.std(0) + 1e-8)
    diag["gesture_probe_acc"] = probe_accuracy(zs, data.y[idx], cfg.seed)  # chance: 1 / n_classes
    return LatentDomains(labels=labels, k=k, silhouette=table, z=zs, diagnostics=diag)


# ---------------------------------------------------------------------------------------------
# The classifier (all methods)


def fit_classifier(x: np.ndarray, y: np.ndarray, domains: np.ndarray | None, model: GesFiNet,
                   cfg: TrainConfig, on_progress: Progress | None = None) -> list[dict]:
    """Cross-entropy, plus a domain adversary on the feature when `domains` is given. Returns history."""
    rng = np.random.default_rng(cfg.seed + 2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    disc = None
    params = list(model.parameters())
    if domains is not None:
        n_dom = int(domains.max()) + 1
        n_cls = int(y.max()) + 1
        disc = Discriminator(cfg.feat_dim * (n_cls if cfg.classwise else 1), n_dom)
        params += list(disc.parameters())
        dt = torch.from_numpy(domains.astype(np.int64))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    history = []
    step = 0
    for ep in range(cfg.epochs):
        model.train()
        if disc is not None:
            disc.train()
        s_loss = s_acc = s_dacc = 0.0
        nb = 0
        for b in _batches(len(x), cfg.batch_size, rng):
            feats = model.features(xt[b])
            logits = model.classifier(feats)
            loss = F.cross_entropy(logits, yt[b])
            if disc is not None:
                lam = adv_lambda(step / total, cfg.adv_weight)
                f_rev = grad_reverse(feats, lam)
                if cfg.classwise:  # outer product with the gesture one-hot: one block per gesture
                    f_rev = (f_rev[:, None, :] * F.one_hot(yt[b], n_cls).float()[:, :, None]).flatten(1)
                d_logits = disc(f_rev)
                loss = loss + F.cross_entropy(d_logits, dt[b])
                s_dacc += float((d_logits.argmax(1) == dt[b]).float().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            s_loss += loss.item()
            s_acc += float((logits.argmax(1) == yt[b]).float().mean())
            nb += 1
            step += 1
        rec = {"epoch": ep + 1, "loss": s_loss / nb, "train_acc": s_acc / nb}
        if disc is not None:
            rec["domain_acc"] = s_dacc / nb
        history.append(rec)
        if on_progress:
            on_progress("train", ep + 1, cfg.epochs, rec)
    recalibrate_batchnorm(model, xt, cfg.batch_size)
    model.eval()
    return history


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int) -> None:
    """Recompute batch-norm running statistics as exact averages over x with the final weights.

    The running averages lag behind the weights during training; with few steps (small data) the
    eval-mode network can be far off its training-mode self. One forward pass fixes that.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, len(x), batch):
        if len(x) - i > 1:
            model(x[i : i + batch])
    for m, mom in zip(bns, saved):
        m.momentum = mom


def train(data: GesFiData, idx: np.ndarray | None, cfg: TrainConfig,
          on_progress: Progress | None = None) -> TrainResult:
    """Train cfg.method on data[idx] (all when None); val_frac of it is held out for in-domain accuracy."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    idx = np.arange(len(data)) if idx is None else np.asarray(idx)
    if cfg.val_frac > 0:
        tr, va = holdout_split(idx, data.y, cfg.val_frac, cfg.seed)
    else:
        tr, va = idx, idx[:0]
    model = _make_model(data, cfg)
    latent = None
    domains = None
    if cfg.method == "dann":
        domains = _dense(data.domains[cfg.domain_factor][tr])
    elif cfg.method == "gesfi":
        latent = mine_latent_domains(data, tr, cfg, on_progress)
        domains = latent.labels
        log.info("latent domains: K=%d silhouette=%s %s", latent.k, latent.silhouette, latent.diagnostics)
    history = fit_classifier(data.x[tr], data.y[tr], domains, model, cfg, on_progress)
    val_acc = accuracy(model, data.x[va], data.y[va])
    return TrainResult(model, cfg, tr, va, val_acc, history, latent, time.perf_counter() - t0)


def _dense(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..n-1 (a held-out domain leaves a gap)."""
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)

