"""`python -m services.monitor`: run the Monitor service (same as `fashion serve monitor`)."""

from services.monitor.app import main

main()
