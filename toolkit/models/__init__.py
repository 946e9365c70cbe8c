"""Reference models: the SoftAlign U-Net denoiser (seed 000) and the Oobleck VAE (Stable Audio Open)."""
