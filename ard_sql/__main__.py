from ard_sql.cli import main

main()
