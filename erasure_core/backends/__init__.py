"""Backends: host models behind the denoiser protocol (erasure_core.denoiser)."""
