from resfast.train import main

main()
