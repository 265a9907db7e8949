"""``python -m imgclf.cli``: the same command as the ``imgclf`` console script."""

from imgclf.cli import app

app(prog_name="imgclf")
