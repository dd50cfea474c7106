"""``python -m mixgeneformer`` runs the ``mixgf`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
