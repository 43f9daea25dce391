-- WEB_CLASS: the T-web cosmic-web class of a galaxy (topology layer).
-- An ENUM, so `Web_Class = 'Void'` compares by name and sorts Void < Sheet < Filament < Knot.
CREATE OR REPLACE TYPE WEB_CLASS AS ENUM ('Void', 'Sheet', 'Filament', 'Knot');
