from syncplane.cli import main

main()
