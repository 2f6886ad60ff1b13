"""Simulated device firmware and its framed serial protocol (installed as ``edgeff.firmware_sim``)."""
