from grok1.cli import main

main()
