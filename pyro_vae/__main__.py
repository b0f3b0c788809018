"""``python -m pyro_vae`` and the ``pyro-vae`` console script: the thread policy first
(``threads``: before torch is imported), then the command line."""

from .threads import apply_cli_policy


def main() -> None:
    apply_cli_policy()
    from .cli import main as cli

    cli(prog_name="pyro-vae")


if __name__ == "__main__":
    main()
