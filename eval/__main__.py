from eval.run import main

main()
