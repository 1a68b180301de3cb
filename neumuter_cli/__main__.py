"""`python -m neumuter_cli ...`: the same as the `neumuter` command."""
from .cli import main

if __name__ == "__main__":
    main()
