"""Input validation shared by the ops: every error names the argument at fault, before any kernel runs."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = ("silu", None)


def tensor(name: str, t: object, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def rank(name: str, t: torch.Tensor, *, exactly: int | None = None, at_least: int | None = None) -> None:
    if exactly is not None and t.dim() != exactly:
        raise ValueError(f"{name} must have {exactly} dimensions, got shape {tuple(t.shape)}")
    if at_least is not None and t.dim() < at_least:
        raise ValueError(f"{name} must have at least {at_least} dimensions, got shape {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def integer(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def real(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def dim_index(name: str, dim: object, ndim: int) -> int:
    integer(name, dim)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimensions")
    return dim % ndim


def codebook(cb: object, z: torch.Tensor, z_name: str, dim: int) -> None:
    """A (K, D) codebook on z's device and of z's dtype, with D equal to z's size along ``dim``."""
    tensor("codebook", cb)
    rank("codebook", cb, exactly=2)
    same_device("codebook", cb, z_name, z)
    same_dtype("codebook", cb, z_name, z)
    if cb.shape[0] == 0 or cb.shape[1] == 0:
        raise ValueError(f"codebook must have at least one code of at least one element, got shape {tuple(cb.shape)}")
    if cb.shape[1] != z.shape[dim]:
        raise ValueError(
            f"codebook has vectors of size {cb.shape[1]} but {z_name} has size {z.shape[dim]} along dim={dim}"
        )


def silu(act: object) -> bool:
    """The kernels' activation flag for ``activation``: True for 'silu', False for None."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")
    return act == "silu"


def group_norm(x: object, x_name: str, num_groups: object, weight, bias, eps: object) -> None:
    tensor(x_name, x)
    rank(x_name, x, at_least=2)
    if integer("num_groups", num_groups) <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {x.shape[1]} channels of {x_name}")
    if not real("eps", eps) > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            tensor(name, t)
            same_device(name, t, x_name, x)
            if t.shape != (x.shape[1],):
                raise ValueError(f"{name} must have shape ({x.shape[1]},) for {x_name}, got {tuple(t.shape)}")


def statistics_dtype(x: torch.Tensor) -> torch.dtype:
    """Norm statistics and float accumulations: float32, or float64 for float64 input."""
    return torch.promote_types(x.dtype, torch.float32)
