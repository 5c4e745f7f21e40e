"""`coach gesfi ...`: the GesFi CSI gesture workload."""

from coach_runtime.cli import Command

COMMANDS = [
    Command("inspect", "edge.csi.inspect", "read a CSI capture, print its layout, render its Doppler image", "edge"),
    Command("simulate", "models.gesfi.simulate_cli", "simulate a CSI gesture dataset with domains", "train"),
    Command("train", "models.gesfi.train_cli", "train GesFi / ERM / DANN and export ONNX", "train"),
    Command("eval", "models.gesfi.eval_cli", "leave-one-domain-out evaluation table", "train"),
]
