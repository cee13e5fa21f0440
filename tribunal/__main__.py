from tribunal.cli import run_cli

run_cli()
