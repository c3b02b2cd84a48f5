"""Database access: connections (`connect`) and every SQL statement pgtasks runs (`queries`)."""
