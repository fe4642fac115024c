from homeforge.cli import main

main()
