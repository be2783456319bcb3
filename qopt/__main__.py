from qopt.cli import main

main()
