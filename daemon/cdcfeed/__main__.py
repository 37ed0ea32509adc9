from cdcfeed.cli import main

main()
