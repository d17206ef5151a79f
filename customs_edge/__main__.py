from customs_edge.cli.main import main

main()
