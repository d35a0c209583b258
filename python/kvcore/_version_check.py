"""Refuse to load against an mlx other than the one kvcore was built for:
mlx has no stable C++ ABI, so a mismatch would fail obscurely or worse."""


def check_mlx_version():
    import mlx.core as mx

    from ._build_info import MLX_VERSION as built

    running = mx.__version__
    if running != built:
        raise ImportError(
            f"kvcore was built against mlx {built} but mlx {running} is "
            f"installed; reinstall kvcore against mlx {running} or install "
            f"mlx=={built}"
        )
