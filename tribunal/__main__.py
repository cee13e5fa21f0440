from tribunal import main

main()
