"""`python -m cm3jax <command> ...` is the same as the `cm3jax` console script."""
from cm3jax.cli import run

if __name__ == "__main__":
    run()
