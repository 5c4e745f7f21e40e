"""COACH runtime: end-cloud collaborative DNN inference."""
