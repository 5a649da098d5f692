from syncplane.entry import main

main()
