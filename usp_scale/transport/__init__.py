"""SiT transport: linear path, velocity loss, dopri5/Heun ODE and Euler-Maruyama SDE samplers; docs/method.md §4.3."""
from .integrators import dopri5, euler, heun, shift_time, time_grid
from .transport import Transport, cosine_loss, create_transport, sample_time

__all__ = ["Transport", "create_transport", "dopri5", "heun", "euler", "shift_time", "time_grid", "sample_time",
           "cosine_loss"]
