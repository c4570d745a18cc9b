"""OpenBLAS preload for MLX's Linux CPU backend (issue 8; in progress)."""


def prepare_process() -> None:
    """Placeholder until the launcher lands: does nothing."""
