from whiteboard.cli import console_main

console_main()
