from edgekit.cli import main

main(prog_name="edgekit")
