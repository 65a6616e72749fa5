"""Example MGRIT apps: the Dahlquist test equation and a damped rotation."""
