"""The retrieval service: a FastAPI app over MongoDB (records + GridFS bytes) and a FAISS index."""
