"""Side by side with Triton and TorchServe: see __main__.py."""
