"""`python -m hf_localsgd COMMAND ...`: the `hf-localsgd` console script (`hf_localsgd.tools.cli`)."""

from .tools.cli import main


if __name__ == "__main__":
    main()
