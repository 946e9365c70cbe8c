"""adm-edge: distil, calibrate, quantize, compile and verify audio latent diffusion models on devices."""

__version__ = "0.1.0"
