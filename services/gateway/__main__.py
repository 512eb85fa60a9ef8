"""`python -m services.gateway`: run the REST gateway (same as `fashion serve gateway`)."""

from services.gateway.app import main

main()
