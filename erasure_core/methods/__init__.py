"""Erasure methods, each written once against the denoiser protocol (erasure_core.denoiser)."""
