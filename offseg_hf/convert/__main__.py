from .official import main

main()
