"""molf.kernels: the Triton kernels (installed from the top-level kernels/ folder)."""
