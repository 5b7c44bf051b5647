"""``python -m deblurcli`` runs the command-line tool."""

from deblurcli.cli.app import main

if __name__ == "__main__":
    main()
