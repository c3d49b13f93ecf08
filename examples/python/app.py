print("hello from app.py")
