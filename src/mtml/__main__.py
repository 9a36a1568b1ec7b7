from mtml.cli import main

main()
