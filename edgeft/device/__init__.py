"""The device side of a bundle: verify it, answer questions with it, check the device. Torch-free."""
