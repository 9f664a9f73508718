"""``python -m vcjax``: the same as the ``vcjax`` command."""

from vcjax.cli import main

if __name__ == "__main__":
    main()
