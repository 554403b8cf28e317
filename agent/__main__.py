"""``python -m agent`` runs the CLI."""

from agent.cli.app import main

if __name__ == "__main__":
    main()
