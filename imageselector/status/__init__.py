"""What image_db.py prints: figures from the database, and its CLI."""
