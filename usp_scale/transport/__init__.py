"""SiT transport: linear path, velocity loss, dopri5/Heun ODE and Euler-Maruyama SDE samplers; docs/method.md §4.3."""
from .integrators import dopri5, euler, heun
from .transport import Transport, create_transport

__all__ = ["Transport", "create_transport", "dopri5", "heun", "euler"]
