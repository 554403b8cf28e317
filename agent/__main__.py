"""``python -m agent`` runs the CLI."""

from agent.cli import main

if __name__ == "__main__":
    main()
