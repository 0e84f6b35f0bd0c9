from dbl.cli import main

main()
