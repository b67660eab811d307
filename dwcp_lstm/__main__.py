from dwcp_lstm.cli import cli_main

cli_main()
