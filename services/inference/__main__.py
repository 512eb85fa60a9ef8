"""`python -m services.inference`: run the Inference service (same as `fashion serve inference`)."""

from services.inference.app import main

main()
