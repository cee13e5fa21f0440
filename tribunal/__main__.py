from tribunal.cli import app

app(prog_name="tribunal")
