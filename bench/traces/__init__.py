"""Mahimahi link traces shipped with the project (data only; see ATTRIBUTION.md).

A package so that the traces are installed with `bench` (package data: *.up, *.md).
"""
