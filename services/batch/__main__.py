"""`python -m services.batch`: run the Batch service (same as `fashion serve batch`)."""

from services.batch.app import main

main()
